"""One router per resource: health, versions, collections, items, search, upgrades."""
