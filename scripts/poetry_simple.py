"""Run Poetry with PyPI read through the simple index (PEP 503/691) only.

Some package mirrors serve the simple index but not PyPI's per-release JSON
API, which plain Poetry needs for `lock` and `install`. This makes Poetry's
PyPI repository take release metadata and file links from the simple index,
the way it treats any other index; on pypi.org both give the same answer, so
the same command works everywhere. The lock file it writes is the usual one.

Usage: python scripts/poetry_simple.py <poetry arguments>
"""

import sys

from poetry.repositories import legacy_repository, pypi_repository

pypi_repository.PyPiRepository._get_release_info = (
    legacy_repository.LegacyRepository._get_release_info
)
pypi_repository.PyPiRepository.find_links_for_package = (
    legacy_repository.LegacyRepository.find_links_for_package
)

from poetry.console.application import main  # noqa: E402

sys.exit(main())
