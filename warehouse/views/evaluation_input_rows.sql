-- One row: one fact an evaluation may read, as one line of text: a model's outcome
-- (seed, gap, convergence, test-set size), one of its hyperparameters, one of its
-- measure values (with the search parameters that --converged-searches-only reads).
-- The md5 of the sorted lines of a selection's dataset and sweep is the fingerprint
-- stored with an evaluation (inputs_md5); evaluation_status recomputes it.
SELECT o.model_id, o.dataset, o.sweep, o.sweep_id, NULL::VARCHAR AS measure,
       concat_ws('|', 'o', o.model_id, o.seed, coalesce(o.gap::VARCHAR, '-'),
                 coalesce(o.converged::VARCHAR, '-'), coalesce(o.test_size::VARCHAR, '-'),
                 o.status) AS line
FROM model_outcomes AS o
UNION ALL
SELECT o.model_id, o.dataset, o.sweep, o.sweep_id, NULL::VARCHAR AS measure,
       concat_ws('|', 'h', h.model_id, h.axis, h.level, h.value_text,
                 coalesce(h.value_num::VARCHAR, '-')) AS line
FROM hyperparameters AS h
JOIN model_outcomes AS o USING (model_id)
UNION ALL
SELECT o.model_id, o.dataset, o.sweep, o.sweep_id, ms.measure,
       concat_ws('|', 'm', ms.model_id, ms.measure, coalesce(ms.value::VARCHAR, '-'),
                 coalesce(ms.params::VARCHAR, '-')) AS line
FROM measures AS ms
JOIN model_outcomes AS o USING (model_id)
