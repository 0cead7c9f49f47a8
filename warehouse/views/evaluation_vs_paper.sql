-- The paper's published figure (paper_figures: Tables 1, 2, 5, 6, 7, 9, 10) beside
-- the latest stored evaluation of the same measure, axis and quantity (tau, psi, Psi,
-- cmi, cmi_s0..2, K, their _std), with the sign agreement. Every evaluation that
-- answers it is a row, with the whole question it answered: filter on command (e.g.
-- 'table psi'), options (->> 'convention' = 'paper' is the like-for-like comparison),
-- the selection (where_sql IS NULL: every model; pgdl, pool_seeds, ...) and paper_table.
SELECT p.paper_table, p.paper_label, p.measure, p.axis, p.quantity, p.statistic,
       p.paper_value, l.value,
       l.value - p.paper_value AS difference,
       sign(l.value) = sign(p.paper_value) AS same_sign,
       l.command, l.options, l.where_sql, l.dataset, l.sweep, l.all_models, l.relevel,
       l.pool_seeds, l.converged_searches_only, l.pgdl, l.ci_level, l.ci_blocks, l.seed,
       l.default_selection,
       l.question_key, l.evaluation_id,
       l.created_at, l.n_models, l.stale
FROM paper_figures AS p
JOIN latest_evaluation AS l
  ON l.measure = p.measure AND l.axis = p.axis AND l.quantity = p.quantity
 AND l.kind = 'measure'
WHERE p.kind = 'measure' AND p.measure IS NOT NULL
