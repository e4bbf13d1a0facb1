"""Pod sandboxes: namespaces pinned without a pause container, the pod files, CNI networking."""
