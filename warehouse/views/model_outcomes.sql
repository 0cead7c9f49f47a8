-- One row: a model and how it ended. `included` is what evaluation uses by
-- default: converged, or convergence unknown (a results table without is.converged).
SELECT
    m.model_id, m.sweep_id, s.name AS sweep, m.dataset, m.seed, m.config_hash, m.status,
    o.train_acc, o.test_acc, o.train_loss, o.test_loss, o.gap, o.converged, o.steps,
    o.train_size, o.test_size,
    coalesce(o.converged, true) AS included
FROM models AS m
JOIN outcomes AS o USING (model_id)
LEFT JOIN sweeps AS s USING (sweep_id)
