"""The core: settings, the database and its models, money and the ledger, the catalog, keys and
accounts, errors and the readers of client input. Everything else stands on it; it imports nothing above."""
