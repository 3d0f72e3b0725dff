"""Scale-out: the pipeline's stages as roles in separate processes, work between them on
Redis Streams, PostgreSQL as the store, the library split over shards."""
