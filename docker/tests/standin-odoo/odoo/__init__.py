"""Stand-in Odoo (see setup.py)."""
