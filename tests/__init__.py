"""popgate's tests.

This file makes ``tests`` a regular package so that ``tests.support`` imports the same way
from pytest (which then puts the repository root on ``sys.path``) and from the scripts
(``python -m tests.support.dovecot …`` run at the repository root), and so that no
third-party ``tests`` package in site-packages can shadow it.
"""
