"""The typed views and the operator actions stay below the faces: no web framework, no Textual."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["rswitch.admin.views", "rswitch.admin.actions"])
def test_views_and_actions_import_no_face(module):
    code = f"import sys, {module}; print(','.join(m for m in ('starlette', 'uvicorn', 'textual', 'typer') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


async def test_core_status_is_the_typed_view_dumped(gateway):
    """The dict Core.status() gives the console and tests is the Status model, key for key."""
    from rswitch.admin import views

    await gateway.post(
        {"messages": [{"role": "user", "content": "hi"}], "variables": {"words": 3}, "model": "sum-a"}
    )
    status = gateway.core.status()
    assert views.dump(views.Status.model_validate(status)) == status
    gateway.core.event("operator", "a note")
    (event,) = gateway.core.console_snapshot()["events"]
    assert event[0] == 1 and event[2:] == ("operator", "a note")  # the console reads (seq, time, kind, text)


def test_the_local_operator_implements_the_whole_interface():
    """The console and the CLI will hold an `Operator`; in-process it must be the local one."""
    import inspect

    from rswitch.admin.actions import LocalOperator, Operator

    wanted = {n: f for n, f in vars(Operator).items() if inspect.iscoroutinefunction(f)}
    assert len(wanted) == 21  # compare, compare_runs, apply_compare joined the 18
    for name, proto in wanted.items():
        impl = getattr(LocalOperator, name)
        assert inspect.iscoroutinefunction(impl), name
        assert inspect.signature(impl).parameters.keys() == inspect.signature(proto).parameters.keys(), name
