"""The artifacts contract between export (which writes it) and the runtime (which reads it):
the manifest schema and the options it records. Below both, so neither imports the other's
package."""
