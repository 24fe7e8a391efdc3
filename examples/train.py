"""A user's program as `program_dir` ships it: run on the chief from its bundle folder.

    tfcluster up --local --program-dir examples --set 'program=python3 train.py --steps 500'

The chief unpacks the bundle of this folder as its working directory and
runs ``program`` there, with the agent venv's bin first on PATH, so
``python3`` is that venv's and sees TensorFlow and tfcluster. This program
says where it runs and which tfcluster it imports, then runs the built-in
training job (tfcluster/discovery/train.py) with the arguments it was given.
A real program would build its own model here, reading TF_CONFIG from its
environment.
"""

import os
import runpy
import sys

import tfcluster.discovery

package = os.path.dirname(os.path.abspath(tfcluster.discovery.__file__))
print(f"train.py: working directory {os.getcwd()}", flush=True)
print(f"train.py: python {sys.executable}, tfcluster from {os.path.dirname(package)}", flush=True)
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_module("tfcluster.discovery.train", run_name="__main__", alter_sys=True)
