"""`python -m services.metadata`"""

from services.metadata.bootstrap import NAME, MetadataSettings, bootstrap
from services.shared.main import run_service

if __name__ == "__main__":
    run_service(NAME, MetadataSettings, bootstrap)
