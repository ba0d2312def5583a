"""The merge methods. Each module computes one method's strength-free `MergedLora`
(hypernet/merged.py) from two LoRAs; `hypernet.merge` holds the registry that CLI, nodes and the
testbed choose from by name."""
