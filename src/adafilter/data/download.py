"""Moved to :mod:`adafilter.utils.download` (the package's one downloader); kept for imports."""

from ..utils.download import (  # noqa: F401
    BASE_URL_ENV,
    Resource,
    download_file,
    extract_archive,
    fetch_resources,
    resource_url,
)
