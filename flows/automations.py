"""The Prefect automation the deployments rely on: a crashed pipeline run is scheduled again.

A flow run crashes when its infrastructure goes: the worker killed or stopped (the run's stage is
ended with it, see shapeflow.dvc_pipeline.ParentWatch), the machine restarted. This automation puts
such a run of a deployment back to Scheduled, with its parameters, so the next worker on the pool
picks it up; DVC skips the stages that finished and training resumes from its last checkpoint. The
flows refuse to start a run that has crashed more than `crash_retries` times (a parameter of each
flow), so a run that crashes every time stops being rescheduled.

`make deploy` calls `python flows/automations.py` after `prefect deploy --all`; it replaces an
automation of the same name, so running it again is harmless.
"""

from __future__ import annotations

import sys

from prefect.automations import Automation
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture

NAME = "shapeflow: reschedule crashed runs"
FLOWS = ("pipeline", "evaluate-only")


def crash_retry() -> Automation:
    return Automation(
        name=NAME,
        description=(
            "A crashed run of a shapeflow deployment (worker killed or stopped mid-run) goes back to "
            "Scheduled; the flow itself refuses to run again after `crash_retries` crashes."
        ),
        trigger=EventTrigger(
            expect={"prefect.flow-run.Crashed"},
            match_related=[
                {"prefect.resource.role": "flow", "prefect.resource.name": list(FLOWS)},
                {"prefect.resource.role": "deployment"},
            ],
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.SCHEDULED,
                name="AwaitingRetry",
                message="crashed (its worker or machine went away): scheduled again",
                force=True,
            )
        ],
    )


def ensure() -> Automation:
    """Create the automation, replacing one of the same name."""
    try:
        Automation.read(name=NAME).delete()
    except ValueError:  # none yet
        pass
    return crash_retry().create()


if __name__ == "__main__":
    created = ensure()
    print(f"automation {created.name!r}: {created.id}", file=sys.stderr)
