-- fgm warehouse schema: the only definition of the warehouse's tables.
-- Applying this file to a warehouse that already has it changes nothing.
-- Keys are natural (config hashes, checkpoint sha256, measure names), never
-- autoincrement, so the same result ingested twice lands on the same row.

-- One row: a property of the warehouse itself. 'schema_version' is read by
-- the code that opens the file; bump it with any change to this file.
CREATE TABLE IF NOT EXISTS fgm_meta (
    key   VARCHAR PRIMARY KEY,
    value VARCHAR NOT NULL
);
INSERT INTO fgm_meta VALUES ('schema_version', '3') ON CONFLICT DO NOTHING;

-- One row: a grid of models trained or ingested together.
CREATE TABLE IF NOT EXISTS sweeps (
    sweep_id     VARCHAR PRIMARY KEY,   -- sha256 prefix of the sweep's name
    name         VARCHAR NOT NULL,
    dataset      VARCHAR,
    config       JSON,                  -- the grid, or the source table's path
    code_version VARCHAR,
    created_at   TIMESTAMP DEFAULT current_timestamp
);

-- One row: one trained network = one configuration, one seed, one dataset.
CREATE TABLE IF NOT EXISTS models (
    model_id    VARCHAR PRIMARY KEY,
    sweep_id    VARCHAR NOT NULL,
    dataset     VARCHAR NOT NULL,
    seed        INTEGER NOT NULL,
    config_hash VARCHAR NOT NULL,       -- sha256 of the canonical JSON of the hyperparameter values
    status      VARCHAR NOT NULL,       -- 'done' | 'failed'
    created_at  TIMESTAMP DEFAULT current_timestamp
);

-- One row: the value of one hyperparameter axis for one model. Grouping and
-- conditioning use `level` (ordinal position on the axis), not the value.
CREATE TABLE IF NOT EXISTS hyperparameters (
    model_id   VARCHAR NOT NULL,
    axis       VARCHAR NOT NULL,
    level      INTEGER NOT NULL,
    value_text VARCHAR NOT NULL,
    value_num  DOUBLE,                  -- NULL where the value is not a number (optimizer)
    PRIMARY KEY (model_id, axis)
);

-- One row: one saved set of weights of a model.
CREATE TABLE IF NOT EXISTS checkpoints (
    model_id VARCHAR NOT NULL,
    role     VARCHAR NOT NULL,          -- 'init' | 'epoch1' | 'final'
    path     VARCHAR NOT NULL,
    sha256   VARCHAR NOT NULL,
    bytes    BIGINT NOT NULL,
    PRIMARY KEY (model_id, role)
);

-- One row: one point of a model's training curve.
CREATE TABLE IF NOT EXISTS traces (
    model_id   VARCHAR NOT NULL,
    step       BIGINT NOT NULL,
    epoch      DOUBLE,                  -- NULL: not known (a trace of a model fgm did not train)
    train_loss DOUBLE,                  -- cross-entropy estimated while training
    lr         DOUBLE,
    seconds    DOUBLE,                  -- wall time since the start of training
    PRIMARY KEY (model_id, step)
);

-- One row: how a model ended. gap = train_acc - test_acc (0-1 loss).
CREATE TABLE IF NOT EXISTS outcomes (
    model_id   VARCHAR PRIMARY KEY,
    train_acc  DOUBLE,
    test_acc   DOUBLE,
    train_loss DOUBLE,                  -- confirmed on the full training set
    test_loss  DOUBLE,
    gap        DOUBLE NOT NULL,
    converged  BOOLEAN,                 -- NULL: unknown (a results table without is.converged)
    steps      BIGINT,
    train_size BIGINT,
    test_size  BIGINT
);

-- One row: one complexity measure of one model. value is NULL when it could
-- not be computed; status and error say why.
CREATE TABLE IF NOT EXISTS measures (
    model_id     VARCHAR NOT NULL,
    measure      VARCHAR NOT NULL,
    value        DOUBLE,
    status       VARCHAR NOT NULL,      -- 'ok' | 'missing' | 'failed' | 'not_applicable'
                                        -- (the model lacks an input it needs: init, trace)
    error        VARCHAR,
    params       JSON,                  -- search budgets, seeds, ... used for this value
    computed_at  TIMESTAMP NOT NULL,
    code_version VARCHAR,
    PRIMARY KEY (model_id, measure)
);

-- One row: a registered complexity measure (mirrors the code's registry).
CREATE TABLE IF NOT EXISTS measure_definitions (
    measure     VARCHAR PRIMARY KEY,
    equation    VARCHAR,                -- the paper's equation number
    family      VARCHAR,                -- module: norms, spectral, margin, ...
    needs       VARCHAR[],              -- final | init | epoch1 | data | trace
    description VARCHAR
);

-- (version 2) One row: one evaluation fgm-query computed and stored (psi, cmi, table,
-- oracle, robust): the question asked (command, its options, the selection of models),
-- the code that answered it, and the data it read. The same question asked of the
-- same data by the same code is the same row: evaluation_id hashes the three.
CREATE TABLE IF NOT EXISTS evaluations (
    evaluation_id  VARCHAR PRIMARY KEY,   -- sha256 prefix of question_key, inputs_md5, code_version
    created_at     TIMESTAMP NOT NULL,    -- when it was last computed (UTC)
    command        VARCHAR NOT NULL,      -- psi | cmi | oracle | robust | table psi | table cmi
    question_key   VARCHAR NOT NULL,      -- sha256 prefix of the command, options and selection
    options        JSON,                  -- the command's own: measure, eps, draws, weighting, ...
    where_sql      VARCHAR,               -- --where, as given
    dataset        VARCHAR,
    sweep          VARCHAR,
    all_models     BOOLEAN NOT NULL,
    relevel        BOOLEAN NOT NULL,
    pool_seeds     BOOLEAN NOT NULL,
    converged_searches_only BOOLEAN NOT NULL,
    pgdl           BOOLEAN NOT NULL,
    ci_level       DOUBLE,                -- --ci, with --blocks and --seed
    ci_blocks      INTEGER,
    seed           INTEGER,
    measure_scope  VARCHAR,               -- measures read: one name, '*' (all) or NULL (none)
    code_version   VARCHAR,
    n_models       INTEGER NOT NULL,      -- the selected models
    models_sha256  VARCHAR NOT NULL,      -- sha256 of their sorted ids, one a line
    inputs_md5     VARCHAR NOT NULL       -- md5 of the rows it read (view evaluation_input_rows)
);

-- (version 2) One row: one figure of an evaluation. axis is 'all' for an overall one.
CREATE TABLE IF NOT EXISTS evaluation_values (
    evaluation_id VARCHAR NOT NULL,
    measure  VARCHAR NOT NULL,           -- a measure, or a baseline: oracle_0.01, random, ...
    kind     VARCHAR NOT NULL,           -- measure | oracle | canonical | random
    axis     VARCHAR NOT NULL,
    quantity VARCHAR NOT NULL,           -- tau, psi, Psi, cmi, cmi_s0, K, ..., *_std, *_lo, *_hi
    value    DOUBLE,                     -- NULL: undefined in this selection
    detail   VARCHAR,                    -- K: the conditioning set that attains it
    PRIMARY KEY (evaluation_id, measure, axis, quantity)
);

-- (version 3) One row: an architecture of models fgm did not train (fgm-ingest TABLE
-- --models models.toml): how to build it again, from the warehouse alone.
CREATE TABLE IF NOT EXISTS architectures (
    arch_id     VARCHAR PRIMARY KEY,      -- sha256 prefix of source, kwargs and code_sha256
    name        VARCHAR NOT NULL,         -- its [arch.NAME] in models.toml
    source      VARCHAR NOT NULL,         -- python:FILE:CLASS | torchvision:NAME | timm:NAME
    code_path   VARCHAR,                  -- python: the file (run to build the model)
    code_sha256 VARCHAR,                  -- python: its sha256 at ingest; checked before each build
    spec        JSON NOT NULL             -- everything above, and the kwargs as written
);

-- (version 3) One row: a dataset of models fgm did not train, with its preprocessing.
CREATE TABLE IF NOT EXISTS datasets (
    dataset_id  VARCHAR PRIMARY KEY,      -- sha256 prefix of name, arrays' sha256, mean, std
    name        VARCHAR NOT NULL,         -- models.dataset of its models
    source      VARCHAR NOT NULL,         -- npz:FILE | torchvision:CLASS
    sha256      VARCHAR NOT NULL,         -- of the arrays as read; checked before each use
    train_size  BIGINT NOT NULL,
    test_size   BIGINT NOT NULL,
    spec        JSON NOT NULL             -- source, location, mean, std, layout
);

-- (version 3) One row: how one model fgm did not train is built: its architecture, the
-- architecture's keyword arguments for this model ("hp.<axis>" filled in), its dataset.
CREATE TABLE IF NOT EXISTS model_builds (
    model_id    VARCHAR PRIMARY KEY,
    arch_id     VARCHAR NOT NULL,
    kwargs      JSON NOT NULL,
    dataset_id  VARCHAR,                  -- NULL: one of fgm's own datasets (models.dataset)
    num_classes INTEGER NOT NULL          -- the model's outputs
);
