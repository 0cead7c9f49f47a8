-- One row: the latest stored value of each question (command, options, selection:
-- question_key) x measure x axis x quantity. A fresh evaluation wins over a stale
-- one however old, so a stale value shows only where nothing fresh answers the
-- question, and then with stale = true: never silently reused.
SELECT e.question_key, e.command, e.where_sql, e.dataset, e.sweep, e.all_models,
       e.relevel, e.pool_seeds, e.converged_searches_only, e.pgdl, e.ci_level,
       e.ci_blocks, e.seed, e.default_selection, e.options,
       v.measure, v.kind, v.axis, v.quantity, v.value, v.detail,
       e.evaluation_id, e.created_at, e.code_version, e.n_models, e.stale
FROM evaluation_values AS v
JOIN evaluation_status AS e USING (evaluation_id)
QUALIFY row_number() OVER (
    PARTITION BY e.question_key, v.measure, v.axis, v.quantity
    ORDER BY e.stale, e.created_at DESC, e.evaluation_id) = 1
