-- One row: one stored value of every evaluation (stale ones too), with its measure's
-- family and equation from measure_definitions (fgm-measure mirrors the registry
-- there; NULL for baselines and for measures the registry does not know).
SELECT e.evaluation_id, e.created_at, e.command, e.options, e.where_sql, e.dataset,
       e.sweep, e.all_models, e.relevel, e.pool_seeds, e.converged_searches_only, e.pgdl,
       e.ci_level, e.ci_blocks, e.seed, e.default_selection, e.question_key, e.n_models,
       e.code_version, e.stale,
       v.measure, v.kind, d.family, d.equation, v.axis, v.quantity, v.value, v.detail
FROM evaluation_values AS v
JOIN evaluation_status AS e USING (evaluation_id)
LEFT JOIN measure_definitions AS d USING (measure)
