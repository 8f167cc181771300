"""What the input-fault tests (tests/test_input_faults_*.py) share: ``_refused``, the one
StageError line a bad input gets (no traceback).
"""

from __future__ import annotations

import pytest

from pipeline.stage import StageError


def _refused(fn, *args, **kw) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(StageError) as e:
        fn(*args, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)
