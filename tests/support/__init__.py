"""Stand-ins for infrastructure the Consul and Nomad binaries would provide.

The binaries cannot be installed where tensoryard's tests run, so the clients are written against the
documented HTTP APIs and exercised against these local servers, which follow the same documents.
"""
