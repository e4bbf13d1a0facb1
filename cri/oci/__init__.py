"""OCI runtimes (runc, crun) and their invocation through conmon."""
