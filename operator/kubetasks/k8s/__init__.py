"""The Kubernetes layer: the only code that talks to the Kubernetes API.

``operator`` runs kopf in a thread of its own with its own database pool;
``handlers`` turns Task objects into task rows and Pods into recoveries;
``status`` writes rows back into the objects' status; ``kube`` is a thin
async wrapper over the official client. The engine never imports from here.
"""
