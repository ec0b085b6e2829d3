import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(__file__))  # parity_common and other test helpers
warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
