"""Images from registries: references, credentials, the registry client and the content store.

- `reference`: parse and normalize image references (`busybox` -> `docker.io/library/busybox:latest`).
- `auth`: credentials from the CRI request or a docker `config.json`, bearer-token challenges and a token cache.
- `registry`: the OCI distribution v2 client (mirrors, auth, redirects, retries, stall detection)
  and the `RegistryError` family.
- `content`: the content-addressed blob store (`blobs/sha256/<hex>`); only verified bytes land in it.
- `platform`: the host platform and picking a manifest out of an index / manifest list.
"""
