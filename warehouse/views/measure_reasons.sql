-- One row: one reason a measure has no value, with how many models it holds for:
-- the measure, its status ('failed': an error computing it; 'not_applicable': the
-- model lacks an input it needs, or the measure is not defined for its architecture;
-- 'missing': not computed, e.g. an empty cell of an ingested table)
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
