"""Host facilities: Linux calls, namespace threads, fd waits, processes, reaping, concurrency."""
