"""`python -m services.access`"""

from services.access.bootstrap import NAME, AccessSettings, bootstrap
from services.shared.main import run_service

if __name__ == "__main__":
    run_service(NAME, AccessSettings, bootstrap)
