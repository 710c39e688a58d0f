"""`python -m services.serving`"""

from services.serving.bootstrap import NAME, ServingSettings, bootstrap
from services.shared.main import run_service

if __name__ == "__main__":
    run_service(NAME, ServingSettings, bootstrap)
