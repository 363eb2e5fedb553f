"""Step caching (DBCache, TaylorSeer) attaches here as `wanlite.cache`; it arrives with the caching issue."""
