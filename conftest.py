"""Collection rules for the whole tree (the package's doctests included)."""

import importlib.util

# The integrations import their library; without the optional extra installed
# their doctests are not collected (their tests skip themselves).
collect_ignore = [
    f"batchgrad/integrations/{module}.py"
    for module, library in (("transformers", "transformers"), ("lightning", "lightning"))
    if importlib.util.find_spec(library) is None
]
