"""`python -m services.tiling`"""

from services.shared.main import run_service
from services.tiling.bootstrap import NAME, TilingSettings, bootstrap

if __name__ == "__main__":
    run_service(NAME, TilingSettings, bootstrap)
