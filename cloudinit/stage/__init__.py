"""What `tfcluster up` stages in the cluster bucket, built on the operator's machine.

Each module makes one kind of object (the static binaries, the tfcluster wheel
with its constraints, the user's program bundle) as a local file, and
`manifest` names every object by its SHA-256 so that the bucket code can skip
what is already there. Nothing here talks to S3: the bucket belongs to the
provider; these functions take paths and bytes and return keys and digests.
"""
