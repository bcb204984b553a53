"""A stand-in for Odoo's source tarball, for building the image where
nightly.odoo.com cannot be reached (`make images`). It installs an `odoo`
command that takes Odoo's flags and serves /web/health as Odoo 17 does."""

from setuptools import setup

setup(
    name="odoo",
    version="17.0.0+standin",
    packages=["odoo"],
    entry_points={"console_scripts": ["odoo = odoo.cli:main"]},
)
