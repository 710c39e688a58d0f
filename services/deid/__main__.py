"""`python -m services.deid`"""

from services.deid.bootstrap import NAME, DeidSettings, bootstrap
from services.shared.main import run_service

if __name__ == "__main__":
    run_service(NAME, DeidSettings, bootstrap)
