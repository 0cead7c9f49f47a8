-- One row: a measure the warehouse holds, with how many models have a value, how
-- many have none because computing it failed, because it does not apply to the
-- model (an input it lacks, like initial weights; an architecture the paper's
-- definition does not cover), or because it was not computed; and its registered
-- definition where there is one.
SELECT
    ms.measure,
    count(*) FILTER (WHERE ms.value IS NOT NULL) AS n_values,
    count(*) FILTER (WHERE ms.status = 'failed') AS n_failed,
    count(*) FILTER (WHERE ms.value IS NULL
                     AND ms.status NOT IN ('failed', 'not_applicable')) AS n_missing,
    count(*) FILTER (WHERE ms.status = 'not_applicable') AS n_not_applicable,
    min(ms.value) AS min_value,
    max(ms.value) AS max_value,
    any_value(d.equation) AS equation,
    any_value(d.family) AS family
FROM measures AS ms
LEFT JOIN measure_definitions AS d USING (measure)
GROUP BY ms.measure
ORDER BY ms.measure
