"""The checks that run before any work starts, each failure one ValueError naming the key.

`check_config` needs nothing but the config: shapes, options, metrics, an exact teacher. It runs in
a fraction of a second (networks are built on the meta device); the test of every shipped file
calls it.
`check_environment` looks outside: the data is readable and shaped like the network, a checkpoint
teacher can be fetched and fits the student, the storage can be written.
"""

from __future__ import annotations

from fmm.config import validate
from fmm.experiment.builders import (build_interpolant, build_objective, build_teacher, check_init, data_shape,
                                     initial_map, shape_model, target_shape)
from fmm.experiment.schema import ExperimentConfig
from fmm.experiment.teachers import TeacherConfig, make_teacher
from fmm.flowmap import same_network
from fmm.infra import storage


class _TeacherNotRead:
    """A checkpoint teacher before it is fetched: its shape is checked by check_environment."""

    t_max = None


def check_config(exp: ExperimentConfig, *, teacher_given_later: bool = False) -> None:
    """Everything about `exp` that needs no data, storage or network. `teacher_given_later`: a distillation
    member whose teacher is still to be trained (a study's) counts as having one."""
    if exp.train.precision == "bf16" and not exp.scaling.use_gpu:
        raise ValueError("train.precision 'bf16' is autocast on GPU: set scaling.use_gpu true or use 'fp32'.")
    interpolant = build_interpolant(exp)
    model = shape_model(exp)
    shape = target_shape(exp)
    if shape is not None:
        _check_shape(exp, shape, tuple(model.sample_shape))
    objective = build_objective(exp, interpolant)
    teacher = None
    if exp.teacher is not None:
        spec = validate(TeacherConfig, exp.teacher, "teacher")
        teacher = make_teacher(spec, interpolant) if spec.kind == "exact" else _TeacherNotRead()
    elif teacher_given_later:
        teacher = _TeacherNotRead()
    objective.prepare(model, teacher)
    if not teacher_given_later:
        check_init(exp)


def check_environment(exp: ExperimentConfig, *, teacher_given_later: bool = False) -> None:
    """What check_config cannot see: the data, a checkpoint teacher, the map `init` names, the storage.
    `teacher_given_later`: the teacher (and what the student starts from) is checked when it exists."""
    interpolant = build_interpolant(exp)
    model = shape_model(exp)
    if exp.data.path is not None:
        _check_shape(exp, data_shape(exp), tuple(model.sample_shape))
    teacher = build_teacher(exp, interpolant) if (exp.teacher or {}).get("kind") == "checkpoint" else None
    if teacher is not None:
        try:
            build_objective(exp, interpolant).prepare(model, teacher)
        except ValueError as err:
            raise ValueError(f"teacher {exp.teacher['path']!r}: {err}") from None
    source = None if teacher_given_later else initial_map(exp, teacher)
    if source is not None and not same_network(model, source):
        raise ValueError(f"init: the student's network {model.net.config} is not the network of the map it "
                         f"starts from, {source.net.config}: init copies weights, so both must be the same "
                         f"network (or set init: none).")
    storage.check_writable(exp.storage.path, "storage.path")


def _check_shape(exp: ExperimentConfig, shape: tuple[int, ...], takes: tuple[int, ...]) -> None:
    if takes != shape:
        raise ValueError(f"the data's samples have shape {list(shape)} but network {exp.network['name']!r} "
                         f"takes {list(takes)}: fix the network keys or data.")
    image_metric = exp.train.eval_metric in ("fid", "fd_classifier")
    if exp.train.eval_metric != "auto" and image_metric != (len(shape) == 3):
        raise ValueError(f"train.eval_metric {exp.train.eval_metric!r} does not apply to samples of shape "
                         f"{list(shape)}: use fid or fd_classifier for images, sw2, energy or mmd for vectors.")
