"""The op-kind table (schedule/kinds.py): the documented table is the code's, and the
consumers read a kind's row rather than which kind it is."""
import re
from pathlib import Path

import pytest

from megatron_offload.schedule import kinds
from megatron_offload.schedule.ir import Op, Schedule, ScheduleError, consumer, producer
from megatron_offload.schedule.kinds import Flow, Lane, OpKind, kinds_table
from megatron_offload.schedule.p2p import build_plan, compute_rows
from megatron_offload.schedule.validate import validate_schedule

DOC = Path(__file__).resolve().parents[2] / "docs" / "schedule-ir.md"


def test_the_documented_table_is_the_code_table():
    text = DOC.read_text(encoding="utf-8")
    found = re.search(r"<!-- kinds-table:begin -->\n(.*?)\n<!-- kinds-table:end -->", text, re.S)
    assert found, "docs/schedule-ir.md lacks the kinds-table markers"
    assert found.group(1) == kinds_table(), "regenerate the table: kinds.kinds_table()"


def test_the_schedule_ir_doc_names_no_outside_documents():
    text = DOC.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text
    root = DOC.parents[1]
    files = {f.relative_to(root).as_posix() for pattern in ("*.py", "*.md")
             for f in root.rglob(pattern)}
    for path in re.findall(r"`([\w/.-]+\.(?:py|md))`", text):
        # every file it names is in the repository
        assert any(f == path or f.endswith("/" + path) for f in files), path


def test_rows_and_codes():
    assert [kind.code for kind in OpKind] == list(range(len(OpKind)))
    assert kinds.KIND_BY_CODE == tuple(OpKind)
    assert (kinds.KIND_F, kinds.KIND_B, kinds.KIND_O, kinds.KIND_R) == (0, 1, 2, 3)
    assert kinds.LETTERS == "FBOR" and kinds.FIRST_COPY_CODE == 2
    for kind in OpKind:
        assert OpKind(kind.value) is kind and kind.spec.letter == kind.value
        assert kind.compute == (kind.lane is None) == kind.spec.compute
    assert kinds.COMPUTE_KINDS == (OpKind.FORWARD, OpKind.BACKWARD)
    assert kinds.FORWARD_PASS_KINDS == (OpKind.FORWARD,)
    assert OpKind.FORWARD.sends is Flow.DOWNSTREAM and OpKind.BACKWARD.sends is Flow.UPSTREAM
    assert OpKind.OFFLOAD.lane is Lane.D2H and OpKind.RELOAD.lane is Lane.H2D
    assert [kind.value for kind in OpKind if kind.weight_grads] == ["B"]


def test_one_op_class_one_parser():
    for text in ("0F3", "0B3", "0O3", "0R3", "0F3.2", "0B3.2", "0O3.2", "0R3.2", "12B7.31"):
        op = Op.parse(text)
        assert str(op) == text and Op.parse(str(op)) == op
    assert Op.parse("1F2") == Op(OpKind.FORWARD, 1, 2) and Op.parse("1F2").layer is None
    assert Op.parse("1R2.0") == Op(OpKind.RELOAD, 1, 2, 0)
    assert Op.parse("0O1.2").sub_unit == (0, 1, 2) and Op.parse("0O1").unit == (0, 1)
    assert Op.parse("0F1").is_compute and not Op.parse("0O1.3").is_compute
    with pytest.raises(ValueError, match="not a unit op"):
        Op.parse("0W1")


def test_a_unit_schedule_takes_no_layer_entries():
    with pytest.raises(ScheduleError, match="layer-level"):
        Schedule.from_text("# megatron-offload schedule pp=1 vpp=1 microbatches=1\n0F0.0,0B0.0\n")
    with pytest.raises(ScheduleError, match="layer-level"):
        Schedule([[Op(OpKind.FORWARD, 0, 0, 1), Op(OpKind.BACKWARD, 0, 0, 1)]], 1, 1).program()


def test_data_flow_follows_the_sends_column():
    pp, vpp = 3, 2
    for kind in OpKind:
        for rank in range(pp):
            for chunk in range(vpp):
                if kind.sends is None:
                    assert (
                        producer(rank, kind, chunk, pp, vpp) is None
                        and consumer(rank, kind, chunk, pp, vpp) is None
                    )
                    continue
                stage = chunk * pp + rank
                source = producer(rank, kind, chunk, pp, vpp)
                target = consumer(rank, kind, chunk, pp, vpp)
                expected_source = stage - kind.sends.step
                expected_target = stage + kind.sends.step
                for got, want in ((source, expected_source), (target, expected_target)):
                    if 0 <= want < pp * vpp:
                        assert got == (want % pp, want // pp)
                    else:
                        assert got is None


def test_copies_are_never_messages():
    from megatron_offload.schedule.catalog import make_schedule
    from megatron_offload.schedule.costs import CostModel
    from megatron_offload.schedule.offload import plan_offload

    schedule = plan_offload(make_schedule("gis", 3, 2, 6, 3), CostModel(offload_ratio=0.5)).schedule
    assert schedule.has_offload
    plan = build_plan(validate_schedule(schedule))
    letters = {message[0] for order in plan.pair_order.values() for _, _, message in order}
    assert letters == {kind.value for kind in OpKind if kind.sends is not None}
    assert all(op.kind.compute for row in compute_rows(schedule) for op in row)
    assert all(op.kind in kinds.FORWARD_PASS_KINDS
               for row in compute_rows(schedule, forward_only=True) for op in row)


def test_validator_messages_come_from_the_table():
    with pytest.raises(
        ScheduleError, match=r"0O0 \(offload\) follows nothing of its unit; each unit runs F first"
    ):
        validate_schedule(Schedule([[Op(OpKind.OFFLOAD, 0, 0)]], 1, 1))
    with pytest.raises(ScheduleError, match="never gets its backward; every rank runs F and B"):
        validate_schedule(Schedule([[Op(OpKind.FORWARD, 0, 0), Op(OpKind.OFFLOAD, 0, 0)]], 1, 1))


def test_the_schedule_package_has_no_import_cycle_through_validate():
    import ast

    source = (Path(kinds.__file__).parent / "ir.py").read_text(encoding="utf-8")
    imported = {node.module for node in ast.walk(ast.parse(source))
                if isinstance(node, ast.ImportFrom)}
    assert "validate" not in imported and not hasattr(Schedule, "validate")
