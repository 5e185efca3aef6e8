"""The backup client: ``appliance-client``, run on a protected Linux host.

It walks the host's folders, cuts and hashes chunks with the store's parameters and key, and sends
only the chunks the appliance does not already have for this asset, compressed, over HTTPS with
the appliance's pinned certificate and a token that can only add points to its asset. This
package imports nothing of the appliance but :mod:`appliance.sources.tree_source`, so it ships as
one zipapp (``scripts/build-client``) that needs only httpx, zstandard, blake3 and pyfastcdc.
"""
