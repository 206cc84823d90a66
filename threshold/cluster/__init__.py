"""A fleet of gateways sharing state through etcd v3.

``etcd`` is the client (etcd's JSON gateway through treq), ``watch`` keeps
one watch up, ``kv`` holds the values and errors, and ``store`` lays the
gateway's state out under the cluster's key prefix. Nothing here imports
threshold.server: the store takes and returns plain JSON-able values.
"""
