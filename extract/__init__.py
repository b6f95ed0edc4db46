"""astrea.extract: the four frozen experts (``astrea.extract.experts``) and the Ray job that runs them
over an image source into the feature store.

    from astrea.extract import ExtractConfig, run
    report = run(ExtractConfig(experts=["all"], data="sample", weights={"*": "random"}, small=True))

Importing this package is cheap: Ray, torch and the expert libraries load when a job runs.
"""

from astrea.extract.config import ExtractConfig, ExtractConfigError, ExtractPlan
from astrea.extract.progress import format_summary
from astrea.extract.run import ExtractError, run  # binds the function over the submodule of the same name

__all__ = ["ExtractConfig", "ExtractPlan", "ExtractConfigError", "ExtractError", "run", "format_summary"]
