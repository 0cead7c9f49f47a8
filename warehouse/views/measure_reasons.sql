-- One row: one reason a measure has no value, with how many models it holds for:
-- the measure, its status ('failed': an error computing it; 'missing': not
-- computed, e.g. a step count not reached or an empty cell of an ingested table)
-- and the error text stored with it (fgm-query measures shows these below its table).
SELECT
    measure,
    status,
    coalesce(nullif(trim(error), ''), 'no reason stored') AS reason,
    count(*) AS n_models
FROM measures
WHERE value IS NULL
GROUP BY ALL
ORDER BY measure, n_models DESC, status, reason
