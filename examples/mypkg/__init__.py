"""Example user package for ``lsa --model mypkg.nets:make_net`` (run with PYTHONPATH=examples)."""
