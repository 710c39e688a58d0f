"""`python -m services.ingestion`"""

from services.ingestion.bootstrap import NAME, IngestionSettings, bootstrap
from services.shared.main import run_service

if __name__ == "__main__":
    run_service(NAME, IngestionSettings, bootstrap)
