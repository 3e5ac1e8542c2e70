import sys
from pathlib import Path

# bench/ modules import each other by name (kernel_cases, ...).
sys.path.insert(0, str(Path(__file__).parent))
