-- One row: one measure of one model, with everything evaluation needs beside it:
-- the model's hyperparameter levels and values, its gap and whether it converged.
-- This is the wide view analysis reads (model x levels x gap x measure).
SELECT
    o.model_id, o.sweep_id, o.sweep, o.dataset, o.seed, o.gap, o.converged, o.included,
    l.levels, l.hp, ms.measure, ms.value, ms.status AS measure_status
FROM model_outcomes AS o
JOIN model_levels AS l USING (model_id)
JOIN measures AS ms USING (model_id)
