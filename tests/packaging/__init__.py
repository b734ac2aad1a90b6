"""What ships, checked without a cluster: the Helm chart rendered and validated by the real helm
and kubeconform (built from their Go modules by e2e/cluster/build.sh on first use), and the
Dockerfile's contract and install step (a fresh virtualenv pip-installing from the package
registry). Slower than tests/unit and needing the network once, so in a tier of its own:
`make packaging`."""
