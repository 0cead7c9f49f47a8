-- One row: a model's hyperparameters as two maps, axis -> level and axis -> value.
SELECT
    model_id,
    map_from_entries(list((axis, level) ORDER BY axis)) AS levels,
    map_from_entries(list((axis, value_text) ORDER BY axis)) AS hp
FROM hyperparameters
GROUP BY model_id
