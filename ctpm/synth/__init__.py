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
- Truth perfusion: gravity gradient, peripheral pruning, heterogeneity, no trapped tracer in large
  vessels, and disease as physiology, cause by cause with whether CT can see it
  (``perfusion.CAUSES``): emphysema (visible), acute embolic wedges (invisible), chronic
  thrombo-embolic mosaic (visible: lower density, thinner vessels) and pulmonary hypertension
  (enlarged central arteries) in the non-cancer cohort; in the cancer cohort a tumour on or beside
  an artery (its distal territory loses flow), atelectasis, pleural effusion and hypoxic
  vasoconstriction. Vessel calibre follows the flow (Murray), so CT vessels carry information.
- CT-visible oracle: the perfusion rebuilt from the visible causes only (``oracle.nii.gz``).
- CT acquisition by institution: slice thickness, reconstruction kernel and noise texture.
- SPECT (``spect``): from projections with pytomography (attenuation from the CT, collimator blur,
  Poisson counts, OSEM with attenuation correction, post-filter) or, fast, in image space; MAA
  clumps, free-breathing blur of the bases and a recorded rigid SPECT/CT misregistration in both.

Every number comes from ``conf/synth.yaml``. The same seed gives the same bytes.

The parts, one concern each: ``anatomy`` (the phantom's body, lungs, fissures and lobes, in a
frame whose x points to the patient's left), ``vessels`` (trees and capsules), ``ct`` (HU, kernel and
noise), ``perfusion`` (truth, territories, disease), ``spect`` (the cameras), ``dose`` (a plan),
``realism`` (CT realism numbers),
``patient`` (one patient drawn on every grid) and ``cohort`` (which patients, their files and the
manifest). Grids and resampling are the geometry core's (``ctpm.geometry``).
"""


from ctpm.synth.anatomy import LOBES, PHANTOM_TO_RAS, Phantom
from ctpm.synth.cohort import cohort_plan, synthesise, write_patient
from ctpm.synth.patient import PatientData, make_patient

__all__ = ["LOBES", "PHANTOM_TO_RAS", "PatientData", "Phantom", "cohort_plan", "make_patient", "synthesise",
           "write_patient"]
