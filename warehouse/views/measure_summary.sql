-- One row: a measure the warehouse holds, with how many models have a value
-- and its registered definition where there is one.
SELECT
    ms.measure,
    count(*) FILTER (WHERE ms.value IS NOT NULL) AS n_values,
    count(*) FILTER (WHERE ms.status = 'failed') AS n_failed,
    count(*) FILTER (WHERE ms.value IS NULL AND ms.status <> 'failed') AS n_missing,
    min(ms.value) AS min_value,
    max(ms.value) AS max_value,
    any_value(d.equation) AS equation,
    any_value(d.family) AS family
FROM measures AS ms
LEFT JOIN measure_definitions AS d USING (measure)
GROUP BY ms.measure
ORDER BY ms.measure
