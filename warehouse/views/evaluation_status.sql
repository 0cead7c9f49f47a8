-- One row: a stored evaluation, with `default_selection` true when it was asked of
-- the default selection (but for --where), and `stale` true when the data it read has changed
-- since: the fingerprint of its selection's rows now (models of its dataset and
-- sweep: outcomes, hyperparameters, and the values of the measures it read) differs
-- from the one stored with it. A model added, dropped or re-trained, a gap, a level
-- or a measure value changed: stale. Evaluations that share a dataset, sweep and
-- measure scope share one fingerprint, computed once.
WITH pools AS (
    SELECT DISTINCT dataset, sweep, measure_scope FROM evaluations
), now AS (
    SELECT p.dataset, p.sweep, p.measure_scope,
           md5(string_agg(r.line, chr(10) ORDER BY r.line)) AS inputs_md5_now
    FROM pools AS p
    JOIN evaluation_input_rows AS r
      ON (p.dataset IS NULL OR r.dataset = p.dataset)
     AND (p.sweep IS NULL OR r.sweep = p.sweep OR r.sweep_id = p.sweep)
     AND (r.measure IS NULL OR p.measure_scope = '*' OR r.measure = p.measure_scope)
    GROUP BY ALL
)
SELECT e.*, n.inputs_md5_now,
       n.inputs_md5_now IS DISTINCT FROM e.inputs_md5 AS stale,
       -- every option of the selection but --where at its default: no --dataset,
       -- --sweep, --all-models, --relevel, --pool-seeds, --converged-searches-only,
       -- --pgdl or --ci
       (e.dataset IS NULL AND e.sweep IS NULL AND NOT e.all_models AND NOT e.relevel
        AND NOT e.pool_seeds AND NOT e.converged_searches_only AND NOT e.pgdl
        AND e.ci_level IS NULL) AS default_selection
FROM evaluations AS e
LEFT JOIN now AS n
  ON e.dataset IS NOT DISTINCT FROM n.dataset
 AND e.sweep IS NOT DISTINCT FROM n.sweep
 AND e.measure_scope IS NOT DISTINCT FROM n.measure_scope
