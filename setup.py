from setuptools import setup, find_packages
setup(name="lspt-kernels", version="0.1.0", packages=find_packages(include=["lspt_kernels*"]))
