"""Synthetic SPECT/CT patients that behave like the paper's cohorts (``ctpm-synth``).

Real perfusion SPECT/CT cannot be shipped, so ctpm trains and is tested on phantoms. Each patient
is a set of analytic shapes in world coordinates (mm), so that the same anatomy can be drawn
on any grid: the CT on the institution's CT grid, the truth perfusion on a working grid, the SPECT
on the camera's own grid. What the phantom holds, and why:

- CT anatomy (HU): body with fat and muscle, ribs, spine, sternum, table; heart, aorta, pulmonary
  trunk, vena cava, oesophagus; trachea and main bronchi whose air touches the lungs (the classic
  segmentation trap); two lungs of different shape (right dome higher, left with the cardiac
  notch), oblique and horizontal fissures giving five lobes; a branching, tapering vessel tree per
  lobe; parenchyma near -850 HU with texture and a denser dependent (posterior) side.
- Truth perfusion: gravity gradient (a few % per cm towards the posterior lung), emphysema
  (destroyed parenchyma below -900 HU, visible on CT, poorly perfused), peripheral pruning near the
  pleura, no trapped tracer in large vessels, embolic wedge defects (the territory of an occluded
  branch: invisible on CT, what no model can learn) and, in the cancer cohort, a tumour that
  compresses the vessels it touches, so that their whole distal territory is hypo-perfused (a cause
  visible on CT, with thinner distal vessels): the shifted domain that fine-tuning must learn.
- SPECT: truth blurred by the camera (Gaussian PSF), sampled on the institution's grid (its own
  size, origin and orientation), Poisson counts, light reconstruction smoothing.

Every number comes from ``conf/synth.yaml``. The same seed gives the same bytes.

The parts, one concern each: ``anatomy`` (the phantom's body, lungs, fissures and lobes, in a
frame whose x points to the patient's left), ``vessels`` (trees and capsules), ``ct`` (HU and
noise), ``perfusion`` (truth, territories, disease), ``spect`` (the camera), ``dose`` (a plan),
``patient`` (one patient drawn on every grid) and ``cohort`` (which patients, their files and the
manifest). Grids and resampling are the geometry core's (``ctpm.geometry``).
"""


from ctpm.synth.anatomy import LOBES, PHANTOM_TO_RAS, Phantom
from ctpm.synth.cohort import cohort_plan, synthesise, write_patient
from ctpm.synth.patient import PatientData, make_patient

__all__ = ["LOBES", "PHANTOM_TO_RAS", "PatientData", "Phantom", "cohort_plan", "make_patient", "synthesise",
           "write_patient"]
