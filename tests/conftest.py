import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests/official_keys.py is a helper module, not a test
