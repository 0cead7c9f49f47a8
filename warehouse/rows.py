"""Typed rows of the warehouse tables (sqlmodel). schema.sql is the definition;
tests/test_schema.py checks that these classes match it column for column."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ARRAY, Column, String
from sqlmodel import Field, SQLModel


class Sweep(SQLModel, table=True):
    __tablename__ = "sweeps"
    sweep_id: str = Field(primary_key=True)
    name: str
    dataset: str | None = None
    config: str | None = None  # JSON
    code_version: str | None = None
    created_at: datetime | None = None


class Model(SQLModel, table=True):
    __tablename__ = "models"
    model_id: str = Field(primary_key=True)
    sweep_id: str
    dataset: str
    seed: int
    config_hash: str
    status: str
    created_at: datetime | None = None


class Hyperparameter(SQLModel, table=True):
    __tablename__ = "hyperparameters"
    model_id: str = Field(primary_key=True)
    axis: str = Field(primary_key=True)
    level: int
    value_text: str
    value_num: float | None = None


class Checkpoint(SQLModel, table=True):
    __tablename__ = "checkpoints"
    model_id: str = Field(primary_key=True)
    role: str = Field(primary_key=True)
    path: str
    sha256: str
    bytes: int


class TracePoint(SQLModel, table=True):
    __tablename__ = "traces"
    model_id: str = Field(primary_key=True)
    step: int = Field(primary_key=True)
    epoch: float
    train_loss: float | None = None
    lr: float | None = None
    seconds: float | None = None


class Outcome(SQLModel, table=True):
    __tablename__ = "outcomes"
    model_id: str = Field(primary_key=True)
    train_acc: float | None = None
    test_acc: float | None = None
    train_loss: float | None = None
    test_loss: float | None = None
    gap: float
    converged: bool | None = None
    steps: int | None = None
    train_size: int | None = None
    test_size: int | None = None


class MeasureValue(SQLModel, table=True):
    __tablename__ = "measures"
    model_id: str = Field(primary_key=True)
    measure: str = Field(primary_key=True)
    value: float | None = None
    status: str
    error: str | None = None
    params: str | None = None  # JSON
    computed_at: datetime
    code_version: str | None = None


class MeasureDefinition(SQLModel, table=True):
    __tablename__ = "measure_definitions"
    measure: str = Field(primary_key=True)
    equation: str | None = None
    family: str | None = None
    needs: list[str] | None = Field(default=None, sa_column=Column(ARRAY(String)))
    description: str | None = None


class Evaluation(SQLModel, table=True):
    __tablename__ = "evaluations"
    evaluation_id: str = Field(primary_key=True)
    created_at: datetime
    command: str
    question_key: str
    options: str | None = None  # JSON
    where_sql: str | None = None
    dataset: str | None = None
    sweep: str | None = None
    all_models: bool
    relevel: bool
    pool_seeds: bool
    converged_searches_only: bool
    pgdl: bool
    ci_level: float | None = None
    ci_blocks: int | None = None
    seed: int | None = None
    measure_scope: str | None = None
    code_version: str | None = None
    n_models: int
    models_sha256: str
    inputs_md5: str


class EvaluationValue(SQLModel, table=True):
    __tablename__ = "evaluation_values"
    evaluation_id: str = Field(primary_key=True)
    measure: str = Field(primary_key=True)
    kind: str
    axis: str = Field(primary_key=True)
    quantity: str = Field(primary_key=True)
    value: float | None = None
    detail: str | None = None


ROW_CLASSES: tuple[type[SQLModel], ...] = (
    Sweep, Model, Hyperparameter, Checkpoint, TracePoint, Outcome, MeasureValue,
    MeasureDefinition, Evaluation, EvaluationValue,
)
